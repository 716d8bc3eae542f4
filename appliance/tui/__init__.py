"""appliance.tui"""
