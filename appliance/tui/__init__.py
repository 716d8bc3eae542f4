"""The operator's Textual TUI (``appliance tui``): ``app.create_app`` builds it; one module per
screen (media, inspect, importing, models, peers, serve, trust, audit); ``base`` holds the
shared pane, job runner and dialogs; ``service``, ``serving`` and ``peering`` adapt the
library API for the screens' worker threads; ``explain`` puts refusals into plain words."""
