"""The agent: a chat REPL (and `run --tools`) over a bundle or an OpenAI-compatible server,
whose model may call sandboxed `python` and `shell` tools.

sandbox.py runs code under bubblewrap with limits; tools.py holds the tool specs and
turns a call into a sandbox run; loop.py is the conversation and the tool loop over a
backend (a local Session or a remote URL); repl.py is the interactive front end."""
