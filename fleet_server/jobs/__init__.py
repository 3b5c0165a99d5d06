"""Job executions and the service side of the AWS IoT Jobs MQTT protocol."""
