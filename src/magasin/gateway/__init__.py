"""The API gateway of distributed mode: nginx in front of every service process, its
configuration rendered from one template for the local cluster and for compose.

`routes` says which service answers which path; `render` turns it and the settings into an
nginx configuration (plus the njs script of the routes several services answer, and the API
docs pages); `nginx` finds, checks and runs the binary.
"""
