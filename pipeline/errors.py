"""The one root of the product's errors; each says what is wrong in a plain sentence."""


class PipelineError(Exception):
    """Root of every error the product raises on purpose."""


class ConfigError(PipelineError):
    """A setting is missing or malformed; the message names the variable."""


class DefinitionError(PipelineError):
    """A segment definition is invalid; the message names the segment, line and column."""

    def __init__(self, message: str, *, segment_id: str | None = None,
                 line: int | None = None, column: int | None = None,
                 source: str | None = None) -> None:
        self.segment_id = segment_id
        self.line = line
        self.column = column
        self.source = source
        where = []
        if source:
            where.append(str(source))
        if line is not None:
            where.append(f"line {line}" + (f", column {column}" if column is not None else ""))
        if segment_id:
            where.append(f"segment {segment_id!r}")
        prefix = " ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.reason = message


class BrokerError(PipelineError):
    """The broker could not be started or reached."""


class SinkError(PipelineError):
    """ClickHouse could not be reached or refused a statement."""
