"""Ray Serve application for PaLI: `serve.app:build_app` (see serve/config.yaml) and `python -m serve`."""
