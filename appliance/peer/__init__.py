"""appliance.peer"""
