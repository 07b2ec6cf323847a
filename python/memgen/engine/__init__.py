"""memgen.engine"""
