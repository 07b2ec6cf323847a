"""memgen.models"""
