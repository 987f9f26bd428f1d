"""The first seed's API stack, rebuilt as the reference for the backend benchmark:
FastAPI + async SQLAlchemy (asyncpg) on PostgreSQL, run under gunicorn with uvicorn workers
exactly as the seed runs it. Same table and the same page size (50) as Floodgate's backend,
so both answer `GET /items` and `POST /items` with the same work.

    DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/postgres \
    gunicorn app:app -k uvicorn.workers.UvicornWorker --workers 2 --bind 127.0.0.1:8000
"""

import datetime
import os
from typing import Optional

from fastapi import Depends, FastAPI
from pydantic import BaseModel, Field
from sqlalchemy import DateTime, String, Text, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

engine = create_async_engine(os.environ["DATABASE_URL"], pool_size=10, max_overflow=10)
Session = async_sessionmaker(engine, expire_on_commit=False)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))


class ItemIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    description: Optional[str] = Field(default=None, max_length=2000)


class ItemOut(ItemIn):
    id: int
    created_at: datetime.datetime


async def session():
    async with Session() as s:
        yield s


app = FastAPI()


@app.get("/items", response_model=list[ItemOut])
async def list_items(limit: int = 50, db: AsyncSession = Depends(session)):
    rows = await db.scalars(select(Item).order_by(Item.id).limit(min(limit, 500)))
    return [ItemOut(id=i.id, name=i.name, description=i.description, created_at=i.created_at) for i in rows]


@app.post("/items", response_model=ItemOut, status_code=201)
async def create_item(body: ItemIn, db: AsyncSession = Depends(session)):
    item = Item(name=body.name, description=body.description,
                created_at=datetime.datetime.now(datetime.timezone.utc))
    db.add(item)
    await db.commit()
    return ItemOut(id=item.id, name=item.name, description=item.description, created_at=item.created_at)
