"""In-process doubles of the HTTP APIs meshfed talks to, written from their official API documentation.

Each is a real HTTP server on loopback, run on its own thread and event loop,
so the real client libraries (py-consul, kubernetes_asyncio) talk to it over
TCP exactly as they would to the real server.
"""
