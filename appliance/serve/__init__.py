"""appliance.serve"""
