"""The running peer: the event loop that carries actions out, the MQTT transport, the learner thread, logs."""
