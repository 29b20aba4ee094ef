"""Many runs (layer L4, experiments): stability studies (``study``), threshold sweeps (``sweep``), the clip
advisor (``advise``), with the spec reading (``spec``) and worker processes (``workers``) they share. Each run
goes through the run driver (``fincast.runs.driver``)."""
