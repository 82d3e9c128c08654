"""The dosimetrists' worklist web app: `service.web.app:create_app(settings) -> FastAPI`."""
