"""Envoy configuration generated from the host's settings: ``extproc-host envoy-config``.

- :mod:`.bootstrap` builds the Envoy bootstrap (listener, ext_proc filter and per-route
  processing modes, clusters) from the routes and what their chains need
  (:mod:`extproc_host.modes`), with envoy-data-plane's typed messages;
- :mod:`.command` is the command line around it.
"""
