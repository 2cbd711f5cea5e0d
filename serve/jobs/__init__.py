"""Jobs that survive: where `/v1/videos` job records live (`JobStore`: SQLite embedded, Redis shared)
and where finished MP4s and uploaded conditioning images live (`ArtifactStore`: a local directory,
S3-compatible storage). Torch-free: the API process and the CLI import all of it."""
