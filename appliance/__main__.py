"""`python -m appliance ...`: the CLI, from whichever tree is on sys.path (tests start the
server this way, so a worktree runs its own code rather than the installed entry point)."""

from appliance.cli import app

app(prog_name="appliance")
