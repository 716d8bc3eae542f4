"""Signed inference receipts: check one (``verify``) or re-run its request here (``replay``).

The format is ``appliance.format.receipt`` (pure); what the digests cover is
``appliance.receipts.digests`` (pure); the server side that signs them is
``appliance.serve.receipts``. docs/DESIGN.md ("Receipts") says what a receipt proves and what
it does not.
"""
