"""`python -m lockgate.server [options]`: the same as `lockgate serve`."""
import typer

from lockgate.server.launch import ServeCommand, serve_command

app = typer.Typer(add_completion=False)
app.command(cls=ServeCommand)(serve_command)

if __name__ == "__main__":
    app()
