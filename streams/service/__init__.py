"""The query node's services: the data plane behind RESP and HTTP."""
