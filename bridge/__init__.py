"""tutum-bridge: every Tutum Stream API event, published to a RabbitMQ topic exchange.

Data flows one way: stream -> event -> spool -> publisher -> broker.
"""

__version__ = "0.1.0"
