"""Double of the A1111 WebUI's ``modules`` package (see tests/webui_double/README.md)."""
