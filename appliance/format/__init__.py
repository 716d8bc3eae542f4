"""appliance.format"""
