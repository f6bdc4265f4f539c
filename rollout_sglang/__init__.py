"""SGLang rollout fleet: client, launcher/supervisor, router, weight sync, and a CPU rollout server."""
