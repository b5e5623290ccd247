"""Serverless peer-to-peer federated learning over MQTT: the peer program."""
