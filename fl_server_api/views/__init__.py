"""API views: each parses the request, calls one service and shapes the answer."""
