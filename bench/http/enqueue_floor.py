"""The floor that ``bench/http/enqueue_bench.py`` compares POST /certify and GET /jobs/{id} with.

A minimal FastAPI app doing only what any image-upload service must: read the multipart upload,
decode it with Pillow, hash it, and INSERT one row (POST /floor); read one row by primary key
(GET /floor/{id}). Same Postgres, same uvicorn, sync endpoints on the same thread pool, and a
connection pool of 40 (the thread pool's size). Started by the benchmark:

    DMAE_FLOOR_DATABASE_URL=postgresql+psycopg://... uvicorn bench.http.enqueue_floor:app
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from typing import Annotated, Any

from fastapi import FastAPI, File, HTTPException, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, select

metadata = MetaData()
rows = Table(
    "floor_uploads",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
)
engine = create_engine(
    os.environ["DMAE_FLOOR_DATABASE_URL"], pool_size=40, max_overflow=0, pool_pre_ping=True
)
metadata.create_all(engine)
app = FastAPI()


@app.post("/floor", status_code=202)
def upload(image: Annotated[UploadFile, File()]) -> Any:
    data = image.file.read()
    img = Image.open(io.BytesIO(data), formats=["PNG", "JPEG", "WEBP"])
    img.load()
    row_id = uuid.uuid4().hex
    values = dict(id=row_id, sha256=hashlib.sha256(data).hexdigest(), width=img.width)
    with engine.begin() as conn:
        conn.execute(insert(rows).values(**values, height=img.height))
    return JSONResponse({"id": row_id, "url": f"/floor/{row_id}"}, status_code=202)


@app.get("/floor/{row_id}")
def read(row_id: str) -> Any:
    with engine.connect() as conn:
        row = conn.execute(select(rows).where(rows.c.id == row_id)).first()
    if row is None:
        raise HTTPException(404, "not found")
    return dict(row._mapping)
