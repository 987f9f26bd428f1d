//! `/items`: list (cursor pagination), create, get, delete.

use http::StatusCode;
use serde_json::{json, Value};

use super::Resp;
use crate::error::{json_response, ApiError};
use crate::startup::App;

pub const DEFAULT_PAGE: i64 = 50;
pub const MAX_PAGE: i64 = 500;
pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_DESCRIPTION_CHARS: usize = 2000;

/// A page request, parsed from `?limit=&after=`.
#[derive(Debug, PartialEq, Eq)]
pub struct PageQuery {
    pub limit: i64,
    pub after: i64,
}

impl PageQuery {
    pub fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let mut page = PageQuery {
            limit: DEFAULT_PAGE,
            after: 0,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "limit" => {
                    page.limit = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_PAGE).contains(n))
                        .ok_or_else(|| {
                            ApiError::invalid(
                                "limit",
                                format!("must be an integer from 1 to {MAX_PAGE}"),
                            )
                        })?
                }
                "after" => {
                    page.after = v.parse().ok().filter(|n: &i64| *n >= 0).ok_or_else(|| {
                        ApiError::invalid("after", "must be the `next` cursor of a previous page")
                    })?
                }
                _ => {}
            }
        }
        Ok(page)
    }
}

/// A new item, validated: name 1-200 characters, description up to 2000, optional.
#[derive(Debug, PartialEq, Eq)]
pub struct NewItem {
    pub name: String,
    pub description: Option<String>,
}

impl NewItem {
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let v: Value =
            serde_json::from_slice(body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
        let Value::Object(mut obj) = v else {
            return Err(ApiError::invalid("body", "must be a JSON object"));
        };
        let name = match obj.remove("name") {
            Some(Value::String(s)) => s,
            None | Some(Value::Null) => return Err(ApiError::invalid("name", "is required")),
            Some(_) => return Err(ApiError::invalid("name", "must be a string")),
        };
        storable("name", &name)?;
        let n = name.chars().count();
        if n == 0 || n > MAX_NAME_CHARS || name.trim().is_empty() {
            return Err(ApiError::invalid(
                "name",
                format!("must be 1 to {MAX_NAME_CHARS} characters, not blank"),
            ));
        }
        let description = match obj.remove("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.chars().count() <= MAX_DESCRIPTION_CHARS => {
                storable("description", &s)?;
                Some(s)
            }
            Some(Value::String(_)) => {
                return Err(ApiError::invalid(
                    "description",
                    format!("must be at most {MAX_DESCRIPTION_CHARS} characters"),
                ))
            }
            Some(_) => return Err(ApiError::invalid("description", "must be a string")),
        };
        Ok(NewItem { name, description })
    }
}

/// Text both engines store as sent: PostgreSQL refuses U+0000 in `text`/`varchar` (22021),
/// and SQLite's `length()` stops counting at it (so its CHECK fails, or passes for a value
/// that is not what was sent). Decided here, before the database: 422 naming the field.
fn storable(field: &'static str, s: &str) -> Result<(), ApiError> {
    if s.contains('\0') {
        return Err(ApiError::invalid(
            field,
            "must not contain the NUL character (U+0000)",
        ));
    }
    Ok(())
}

pub async fn list(app: &App, query: Option<&str>) -> Result<Resp, ApiError> {
    let page = PageQuery::parse(query)?;
    // One extra row says whether there is a next page, without an empty last page.
    let mut items = app.db.list_items(page.after, page.limit + 1).await?;
    let more = items.len() as i64 > page.limit;
    items.truncate(page.limit as usize);
    let next = if more {
        items.last().map(|i| i.id.to_string())
    } else {
        None
    };
    Ok(json_response(
        StatusCode::OK,
        &Page {
            items: &items,
            next,
        },
    ))
}

/// A page of items, serialized straight from the rows (no intermediate `Value` tree: that
/// was a map insert per field per item, a few percent of a GET under load).
#[derive(serde::Serialize)]
struct Page<'a> {
    items: &'a [crate::db::Item],
    next: Option<String>,
}

pub async fn create(app: &App, body: &[u8]) -> Result<Resp, ApiError> {
    let new = NewItem::parse(body)?;
    // create_item returns only after the row is committed.
    let item = app
        .writer
        .create_item(&new.name, new.description.as_deref())
        .await?;
    let mut resp = json_response(StatusCode::CREATED, &item);
    resp.headers_mut().insert(
        http::header::LOCATION,
        format!("/items/{}", item.id).parse().expect("ascii"),
    );
    Ok(resp)
}

pub async fn get(app: &App, id: i64) -> Result<Resp, ApiError> {
    match app.db.get_item(id).await? {
        Some(item) => Ok(json_response(StatusCode::OK, &item)),
        None => Err(ApiError::NotFound(format!("item {id} not found"))),
    }
}

pub async fn delete(app: &App, id: i64) -> Result<Resp, ApiError> {
    if app.db.delete_item(id).await? {
        Ok(json_response(StatusCode::OK, &json!({ "deleted": id })))
    } else {
        Err(ApiError::NotFound(format!("item {id} not found")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_query_defaults_and_bounds() {
        assert_eq!(
            PageQuery::parse(None).unwrap(),
            PageQuery {
                limit: 50,
                after: 0
            }
        );
        assert_eq!(
            PageQuery::parse(Some("limit=500&after=7")).unwrap(),
            PageQuery {
                limit: 500,
                after: 7
            }
        );
        for bad in ["limit=0", "limit=501", "limit=x", "after=-1", "after=abc"] {
            let e = PageQuery::parse(Some(bad)).unwrap_err();
            assert_eq!(e.status(), 422, "{bad}");
        }
    }

    #[test]
    fn new_item_validation_names_the_field() {
        let ok = NewItem::parse(br#"{"name":"x","description":"y"}"#).unwrap();
        assert_eq!(ok.description.as_deref(), Some("y"));
        let cases: [(&[u8], u16, &str); 10] = [
            (b"{", 400, ""),
            (b"[1]", 422, "body"),
            (br#"{"description":"y"}"#, 422, "name"),
            (br#"{"name":""}"#, 422, "name"),
            (br#"{"name":5}"#, 422, "name"),
            (br#"{"name":"x","description":7}"#, 422, "description"),
            (br#"{"name":"   "}"#, 422, "name"),
            (br#"{"name":"\u0000"}"#, 422, "name"),
            (br#"{"name":"a\u0000b"}"#, 422, "name"),
            (
                br#"{"name":"a","description":"x\u0000"}"#,
                422,
                "description",
            ),
        ];
        for (body, status, field) in cases {
            let e = NewItem::parse(body).unwrap_err();
            assert_eq!(e.status(), status);
            if let ApiError::Invalid { field: f, .. } = e {
                assert_eq!(f, field);
            }
        }
        let long = format!(r#"{{"name":"{}"}}"#, "é".repeat(201));
        assert!(NewItem::parse(long.as_bytes()).is_err());
        let exact = format!(r#"{{"name":"{}"}}"#, "é".repeat(200));
        assert!(NewItem::parse(exact.as_bytes()).is_ok());
    }
}
