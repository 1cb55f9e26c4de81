"""``python -m facefuse.serve``: the ``facefuse serve`` command on its own."""

from .cli import serve_command

if __name__ == "__main__":
    serve_command(prog_name="facefuse serve")
