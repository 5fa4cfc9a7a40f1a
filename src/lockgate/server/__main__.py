"""`python -m lockgate.server [options]`: the same as `lockgate serve`."""
import typer

from lockgate.server.launch import serve_command

if __name__ == "__main__":
    typer.run(serve_command)
