"""Performance model: roofline step times, a simulation of the engine's scheduler, and the
highest request rate one replica sustains within the SLO. Measured profiles override the
roofline (see `skybroker.perf.profile`)."""
