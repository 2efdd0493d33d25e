"""A replica's log survives vLLM's logging set-up (a dictConfig, which closes every handler)."""

import logging
import logging.config
import logging.handlers

from llmserve import logs


def test_records_after_a_dict_config_still_reach_serves_log_file(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "_serve_log_files", [])
    serve_logger = logging.getLogger("ray.serve")
    log_file = logging.FileHandler(tmp_path / "replica.log")
    buffer = logging.handlers.MemoryHandler(capacity=1000, target=log_file, flushLevel=logging.ERROR)  # as Serve sets it up
    serve_logger.addHandler(buffer)
    package_logger = logging.getLogger("llmserve")
    saved = (list(package_logger.handlers), package_logger.level, package_logger.propagate)
    try:
        package_logger.handlers = []
        logs.log_into_serve_replica_log()
        logging.getLogger("llmserve.server").error("before the engine")
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})  # what vLLM does
        logging.getLogger("llmserve.server").error("lost without the repair")
        assert buffer.target is None
        logs.reopen_serve_replica_log()
        logging.getLogger("llmserve.server").error("after the engine")
        written = (tmp_path / "replica.log").read_text()
        assert "before the engine" in written and "lost without the repair" in written and "after the engine" in written
    finally:
        serve_logger.removeHandler(buffer)
        log_file.close()
        package_logger.handlers, package_logger.level, package_logger.propagate = saved
