"""The web console and its JSON API (SPEC §10): reads of the store, the runs open now, the HTTP side."""
