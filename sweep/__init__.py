"""The Ray driver: manifests -> plan -> actors -> merge -> artefacts; the CLI lives here."""
