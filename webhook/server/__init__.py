"""The HTTP side: the aiohttp applications, thin handlers, TLS with certificate reloads."""
