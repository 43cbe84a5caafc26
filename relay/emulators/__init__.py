"""Provider emulators: each provider's side, written from its documents (see ``relay emulate``)."""
