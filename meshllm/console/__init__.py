"""The console: the node's status API (``/api/status``), and the page and event stream built on it."""
