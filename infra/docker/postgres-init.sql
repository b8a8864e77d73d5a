-- Runs once, when the postgres service initialises an empty data volume (as POSTGRES_USER, which
-- owns what it creates). POSTGRES_DB already created `prefect`; MLflow's tracking store and its
-- basic-auth user store get a database each (the two keep separate Alembic histories).
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
