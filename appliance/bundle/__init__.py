"""appliance.bundle"""
