"""The central license server: catalog, licenses, activation, Connect, admin API.

One module per concept (see ``docs/server.md``); :func:`tessera.server.app.create_app`
builds the ASGI app and :mod:`tessera.server.runner` serves it. Importing this package
pulls in nothing heavy, so the agent never loads the server's dependencies by accident.
"""

__all__: list[str] = []
