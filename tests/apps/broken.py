"""An app that fails to import."""

raise RuntimeError("broken deploy: this module cannot be imported")
