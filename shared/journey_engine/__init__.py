"""The pure journey engine, its state and catalog, and its virtual-time simulator.

Shared because two services run it: the orchestrator for real, the admin for dry runs of drafts.
"""
