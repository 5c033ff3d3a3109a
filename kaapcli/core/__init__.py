"""The kaapcli library: typed functions returning results; never imports typer or rich."""
