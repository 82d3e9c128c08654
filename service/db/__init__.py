"""The database: tables (`service.db.tables`) and engine/session setup (`service.db.session`)."""
