"""Operations on registered models: the MLflow registry and tracking, service probes, the audit log, promotion and rollback. Not pipeline steps."""
