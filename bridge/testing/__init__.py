"""The testing kit for worker authors (docs/contract.md section 10): `pip install 'tutum-bridge[testing]'`.

The pytest plugin (`plugin.py`) gives a worker's integration tests a broker
(`amqp_url`, `brokers.py`), a scripted Tutum stream (`tutum_stream`, `stream.py`) and
the real bridge between them (`tutum_bridge`, `process.py`).
"""
