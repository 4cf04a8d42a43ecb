"""The gate and the call scope: principal -> Casbin decision -> run -> audit record -> result."""
