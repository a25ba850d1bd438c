"""`featurekit serve RUN_DIR [RUN_DIR ...]`: a local web app over runs' feature stores, with live model calls.

Modules: `runs` (the served run folders, addressed by name or index), `queries` (what each page reads from a
store), `live` (try a text, steer: the model loaded on first use), `views` (templates and HTML helpers),
`server` (routes, security headers, limits, `serve`). Templates and static files are package data. The app
listens on 127.0.0.1 by default, only reads run folders, and escapes every text it shows.
"""
