"""Real parts for tests: a mosquitto per test, pty serial pairs, ALSA capture, sd_notify."""
