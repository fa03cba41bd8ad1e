"""Typed models of what users ask for, shared by the CLI, the API, the store and the agent.

Validation lives here once, so every front end rejects the same input with the same message.
"""
