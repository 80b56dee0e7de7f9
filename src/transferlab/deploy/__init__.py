"""Taking a trained bundle out of Python: export formats checked against torch, and the HTTP
service. Deployment knows bundles, not how they were trained."""
