"""The asyncio daemon: one module per concern, composed in node.daemon."""
