-- Extra databases beside POSTGRES_DB (mlflow): Prefect's own, and the taskvec audit log.
CREATE DATABASE prefect;
CREATE DATABASE taskvec_audit;
