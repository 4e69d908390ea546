"""exoctl: the operator CLI that reads a master over HTTP (cli: commands, render: tables)."""
